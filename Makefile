# Fleet's two commands: `make demo` (the local stack with a demo workload) and `make test`
# (every check). Both install what they need when it is missing.
.PHONY: demo test bench setup up down status

demo:
	@bash deploy/local/demo.sh

test:
	@bash deploy/local/test.sh

bench:
	@bash deploy/local/bench.sh

setup:
	@bash deploy/local/setup.sh

up:
	@bash deploy/local/stack.sh up

down:
	@bash deploy/local/stack.sh down

status:
	@bash deploy/local/stack.sh status
