# Scenario 3: onceq run wordcount vs a threaded Python script (bench/results/peers_dedup.csv).
load 'bench/plots/common.gp'
set output dir . '/peers_dedup.png'
set title sprintf("dedup + word count: %d events, 10%% duplicates, 2 workers (median of %d)", events, runs)
set ylabel 'events/s (higher is better)'
set yrange [0:*]
set format y '%.1s%c'
set boxwidth 0.5
set xtics scale 0
set offsets 0.5, 0.5, 0, 0
plot dir . '/peers_dedup.csv' every ::1 using 0:5:($0 + 1):xtic(1) with boxes lc variable notitle, \
     '' every ::1 using 0:5:(sprintf("%d/s  (%.1fx)", $5, $6)) with labels offset 0,0.8 notitle
