"""MixMIM reproduction and benchmark suite."""

# No OpenMP wait policy is set here: libgomp's default applies (an idle thread spins a while before
# it sleeps). Until the thirteenth benchmark session this package set OMP_WAIT_POLICY=PASSIVE, chosen
# on a 2-core machine shared with other jobs. On an idle machine that made every multi-threaded
# step wait for sleeping threads to wake: with 2 threads, a MixMIM-B pretraining step took 1.20x as
# long (95% CI 1.07-1.31, 8 rounds) and the engines on built-in data ran at 1/1.48 of the default's
# images/s without loader workers (1.35-1.54) and 1/1.16 with two (1.02-1.41), 6 runs each
# (benchmarks/README.md, "The OpenMP wait policy"). Results are the same bit for bit either way.
# On a machine shared with other busy processes, export OMP_WAIT_POLICY=PASSIVE before Python starts.
