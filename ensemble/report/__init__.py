"""`gitseg report`: what a search and its ensemble's report says (report.py) and how it is drawn
(render.py, figures.py)."""
