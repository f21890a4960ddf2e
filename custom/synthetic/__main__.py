import sys

from custom.synthetic.dataset import main

sys.exit(main())
