// Command empty does nothing: test/bench/floor.sh times its exec to exit,
// the least any Go plugin pays per call on the machine.
package main

func main() {}
