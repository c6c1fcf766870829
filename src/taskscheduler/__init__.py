"""A fault-tolerant distributed task scheduler: PostgreSQL for state, Celery over Redis for delivery."""

__version__ = "0.1.0"
