from dgconvert.cli import main

main()
