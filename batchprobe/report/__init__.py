"""Rendering: results in, rich renderables, JSON-able dicts, CSV and Markdown text out. No torch,
no printing, no files: `cli` decides where things go.

`json` holds the machine-readable contract; one view module per command (`find_max`, `plan`,
`estimate`, `check`, `noise`, `env`); `format` the shared number formatting.
"""
