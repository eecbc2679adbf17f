# Scenario 4: onceq run vs the bare loop and the memchr pass (bench/results/peers_ideal.csv).
load 'bench/plots/common.gp'
set output dir . '/peers_ideal.png'
set title sprintf("onceq run vs the ideal: %d events, 10%% duplicates (median of %d)", events, runs)
set ylabel 'events/s, log scale (higher is better)'
set logscale y
set format y '%.0s%c'
set yrange [100000:5e8]
set boxwidth 0.6
set xtics scale 0 font ",9"
set offsets 0.5, 0.5, 0, 0
label(c, h, w) = c eq 'memchr' ? 'memchr only' : c eq 'bare' ? 'bare loop' : sprintf("onceq %s\n-w %s", h, w)
plot dir . '/peers_ideal.csv' every ::1 using 0:5:($0 + 1):xtic(label(strcol(1), strcol(2), strcol(3))) with boxes lc variable notitle, \
     '' every ::1 using 0:5:(sprintf("%.2fx bare\n%.3fx memchr", $6, $7)) with labels offset 0,1.8 notitle
