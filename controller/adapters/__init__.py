"""One thin adapter per outside system; each translates its library's errors into ``controller.errors``."""
