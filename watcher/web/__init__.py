"""``pawcam serve``: the web app over a results CSV (see watcher/web/app.py)."""
