"""Canary routing of the public model id between the original and the compressed model.

Modules (one job each): ``config`` (CanaryConfig from YAML / flags), ``router`` (which variant answers
a request, and why), ``divergence`` (teacher-forced comparison math), ``shadow`` (background shadow
runs and comparisons), ``rollout`` (staged rollout state machine), ``admin`` (admin API), ``canary``
(the facade the API layer talks to). ``review`` and ``metrics`` belong to the review side.
"""
