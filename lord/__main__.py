from lord.cli import main

main()
