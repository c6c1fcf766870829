"""The database: tables, connections, and every task transition as one guarded statement."""
