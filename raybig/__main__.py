from raybig.cli import app

app(prog_name="raybig")
