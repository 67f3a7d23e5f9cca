from pfq_edge.cli import main

main()
