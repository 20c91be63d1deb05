from tuili.cli import main

main()
