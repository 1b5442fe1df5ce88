"""Reports of analyses: text tables (:mod:`.tables`), matplotlib figures (:mod:`.figures`) and a
self-contained HTML page (:mod:`.html`). Import the submodule you need; matplotlib and rich load lazily."""

__all__: list[str] = []
