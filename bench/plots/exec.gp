# Scenario 1: onceq exec handler vs GNU parallel (bench/results/peers_exec.csv).
load 'bench/plots/common.gp'
set output dir . '/peers_exec.png'
set title sprintf("exec handler vs GNU parallel: %d events through /bin/true, 2 at a time (median of %d)", events, runs)
set ylabel 'jobs/s (higher is better)'
set yrange [0:*]
set format y '%.0f'
set boxwidth 0.6
set xtics scale 0 font ",9"
set offsets 0.5, 0.5, 0, 0
set key top right
plot dir . '/peers_exec.csv' every ::1 using 0:6:($0 + 1):xtic(split2(strcol(1))) with boxes lc variable notitle, \
     '' every ::1 using 0:6:(sprintf("%d/s  (%.1fx)", $6, $7)) with labels offset 0,0.8 notitle, \
     2500 with lines dt 2 lw 2 lc rgb '#c00000' title 'goal: 2,500 jobs/s'
