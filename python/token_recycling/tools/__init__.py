"""The tools around the library: the ``token-recycling`` command (cli.py, with usage.py), the benchmark
runner and its report (bench.py, bench_batch.py, report.py), the data sets (datasets.py), model loading
and GGUF conversion (models.py) and the torchrun tensor-parallel loader (tp.py).

They use the library (``token_recycling``); the library never imports them."""
