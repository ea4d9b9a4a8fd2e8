"""The ground floor: edit requests, hparams, the algorithm registry, the edit transaction (deltas, guard, result,
memory). Imports nothing from algorithms, compat, bench, cli, studies or lens."""
