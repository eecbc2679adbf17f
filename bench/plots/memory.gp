# Scenario 5: resident memory per remembered id (bench/results/peers_scale.csv).
load 'bench/plots/common.gp'
set output dir . '/peers_memory.png'
set title "resident memory per remembered id"
set xlabel 'unique ids (log scale)'
set ylabel 'bytes per id (lower is better)'
set logscale x
set format x '10^{%L}'
set terminal pngcairo enhanced
set logscale y
set yrange [10:1000]
set ylabel 'bytes per id, log scale (lower is better)'
set key top right
plot dir . '/peers_scale.csv' every ::1 using 3:11 with linespoints lw 2 pt 7 title 'whole onceq run: (max RSS - 100-event run) / ids', \
     '' every ::1 using 3:12 with linespoints lw 2 pt 5 title 'processed set alone (bench\_idset\_mem)', \
     32 with lines dt 2 lw 2 lc rgb '#c00000' title 'goal: 32 bytes/id'
