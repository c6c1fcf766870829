from taskscheduler.cli import main

main()
