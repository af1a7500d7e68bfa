"""qpeft benchmark suite: ``python -m benchmarks [scenario ...]`` (``make bench`` runs them all).

Each scenario times qpeft and its peers interleaved in one process (round-robin, warm-up, median of
at least 10 repeats, 2 threads), prints the ratios and rewrites ``benchmarks/RESULTS.md``. Peers
(HF PEFT) are imported inside the scenarios only; qpeft never depends on them.
"""
