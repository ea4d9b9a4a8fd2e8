"""The model floor: architecture adapters, loading, hooks, resumed forward passes, scoring and the statistics
of layer inputs. Imports nothing from algorithms, compat, bench, cli, studies or lens."""
