"""The scheduler: dispatch due tasks, rescue stuck and lost ones. Each step is `run_once(now)`."""
