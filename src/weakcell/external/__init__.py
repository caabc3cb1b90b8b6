"""Public HPA images as an extra training set: lists, location tables, polite fetching, conversion
(``make external``; ``weakcell.external.stage`` is the entry point)."""
