// Command prog passes a fault point three times (fault_test.go).
package main

import (
	"fmt"

	"github.com/qoscni/qoscni/internal/fault"
)

func main() {
	for i := 1; i <= 3; i++ {
		fault.At("ADD", "veth")
		fmt.Println("passed", i)
	}
}
