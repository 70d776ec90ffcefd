package node

// registerBuiltinDrivers installs the drivers that run inside the agent.
func registerBuiltinDrivers(r *runner) {}
