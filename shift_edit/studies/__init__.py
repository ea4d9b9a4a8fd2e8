"""Studies of the paper's appendix G: minimum learning rate per layer, damage, layer sweep.

- :mod:`.search`: log-scale bracketing then bisection for the smallest step that works.
- :mod:`.perplexity`: WikiText perplexity (paper protocol), one function to swap.
- :mod:`.data`: CounterFact records from the shared data folder.
- :mod:`.min_lr`: minimum lr / eta per record and layer for SHIFT, SGD, ADAM (Fig. 24).
- :mod:`.layer_sweep`: SHIFT efficacy / paraphrase / neighborhood / perplexity vs layer.
"""
