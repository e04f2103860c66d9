"""Prefect flows and tasks: the only part of ionflow that imports prefect."""
