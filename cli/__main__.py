from ndb.cli.main import main

main()
