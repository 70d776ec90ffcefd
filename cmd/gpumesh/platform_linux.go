package main

// agentOS is true where the agent runs (platform.go).
const agentOS = true
