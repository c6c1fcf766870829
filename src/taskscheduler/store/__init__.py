"""The database: the only place that writes a task's status, each change one guarded statement.

`db` (the Database of a process), `models` (the tables), `sql` (what the statements share), and the
statements by section, each a public constant named after what it does: `creation` (creating
tasks), `transitions` (a worker's claim, heartbeat and outcomes), `sweeps` (the scheduler's dispatch,
rescue and retention), `operations` (what operators read and do), `schedules` (recurring schedules
and the tasks they create), `dlq`, `processes`.
"""
