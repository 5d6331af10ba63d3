from meshnet.relay.server import main

main()
