"""Experiments on the shapes world: training its teacher, the demo, the ablation and the reports."""
