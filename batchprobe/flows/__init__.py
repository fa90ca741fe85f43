"""One module per command, each `run(...) -> Result`: find_max, plan, estimate, check, noise.

Flows decide what to measure and in which order; the session measures; `results` holds what comes
back; `report` renders it. Flows never print: they tell a `Progress` what is happening.

To add a command: a flow module here (its `run` returning a result type from `results`), a view
module in `report/` (and its JSON in `report/json.py`), and a Typer command in `cli/app.py`.
"""
