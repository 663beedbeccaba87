"""Small generated tasks with checkable answers (quickstart, recipes, tests)."""
