from diffgen.cli import main

main()
