from conveyor.cli import app

app()
