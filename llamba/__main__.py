from llamba.cli import main

main(prog_name="llamba")
