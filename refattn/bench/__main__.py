from refattn.bench.run import main

raise SystemExit(main())
