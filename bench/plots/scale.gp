# Scenario 5: throughput vs input size (bench/results/peers_scale.csv).
load 'bench/plots/common.gp'
set output dir . '/peers_scale.png'
set title sprintf("onceq run (wordcount, -w 2, 10%% duplicates): throughput vs input size (median of %d)", runs)
set xlabel 'events in the file (log scale)'
set ylabel 'events/s'
set y2label 'MB/s'
set logscale x
set format x '10^{%L}'
set terminal pngcairo enhanced
set yrange [0:*]
set format y '%.1s%c'
set y2range [0:*]
set y2tics
set key bottom right
plot dir . '/peers_scale.csv' every ::1 using 1:6 with linespoints lw 2 pt 7 title 'events/s (left)', \
     '' every ::1 using 1:7 axes x1y2 with linespoints lw 2 pt 5 dt 2 title 'MB/s (right)'
