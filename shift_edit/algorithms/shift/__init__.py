"""The forward-pass shift family (SHIFT, SHIFT_PLUS, SHIFT_NEURON, SHIFT_SUBJECT) and the machinery they share."""
