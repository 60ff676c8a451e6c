"""Measurements of the shapes world: the rule-based evaluator, the toy feature network, quality reports."""
