"""The papers' claims, measured: each claim a row with the paper's statement, moelab's value with its 95%
interval and null, and a verdict that follows from them (`verdict.py`). Rows train what they need through a
cached workspace (`workspace.py`) and write one JSON result each (`record.py`); `table.py` renders
docs/CLAIMS.md from those results. The runner is `benchmarks/claims.py`.
"""
