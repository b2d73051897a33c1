"""The training stage: typed configs (`config`, `search_config`), the one training loop (`loop`) and
the sessions it runs under (Ray Train worker, Ray Tune trial, in-process), checkpoints, the Ray Train
driver (`train`) and the Ray Tune search (`search`)."""
