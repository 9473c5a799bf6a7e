from cgc_lightning.cli import main

main()
