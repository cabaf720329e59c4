from qlora_lab.cli import main

main()
