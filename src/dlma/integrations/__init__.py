"""dlma inside other libraries' training loops (optional: each needs its library's extra)."""
