# Shared settings for the bench_peers.sh plots (loaded by each script).
set terminal pngcairo size 900,480 font "DejaVu Sans,10" noenhanced
set datafile separator ','
set style fill solid 0.75 border -1
set grid ytics lc rgb '#dddddd'
set key top left
set border 3
set bmargin 4
set tics nomirror
# Set by bench_peers.sh with -e; defaults for running a script by hand.
if (!exists("runs")) runs = 3
if (!exists("events")) events = 0
if (!exists("dir")) dir = 'bench/results'
# "name (detail)" -> "name\n(detail)": two-line tick labels.
split2(s) = strstrt(s, " (") > 0 ? s[1:strstrt(s, " (") - 1] . "\n" . s[strstrt(s, " (") + 1:] : s
