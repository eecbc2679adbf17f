# Scenario 2: onceq library queue vs beanstalkd (bench/results/peers_queue.csv).
load 'bench/plots/common.gp'
set output dir . '/peers_queue.png'
set title sprintf("queue with timeouts: %d jobs, TTR 30 s, 1 producer then 2 consumers (median of %d)", events, runs)
set ylabel 'jobs/s, log scale (higher is better)'
set logscale y
set format y '%.0s%c'
set yrange [1000:*]
set style data histogram
set style histogram clustered gap 1
set xtics scale 0
plot dir . '/peers_queue.csv' every ::1 using 5:xtic(split2(strcol(1))) title 'put', \
     '' every ::1 using 6 title 'reserve + delete (consume)', \
     '' every ::1 using 7 title 'put + consume (total)'
