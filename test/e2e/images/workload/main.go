// Command workload is the e2e workload container (the image
// images.Workload). Over TCP it answers each connection with one line
// "<hostname> <remote-ip:port>\n" and closes it; over UDP it answers each
// datagram with "<hostname> " followed by the datagram. Under a kubelet the
// hostname is the pod's name, so a client learns which pod answered and
// which source address that pod saw.
//
// It logs one line to stderr once both sockets are bound, naming the bound
// addresses ("-tcp 127.0.0.1:0" picks a free port), and exits 0 on SIGINT
// or SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	tcpAddr := flag.String("tcp", ":8080", "TCP listen address")
	udpAddr := flag.String("udp", ":8081", "UDP listen address")
	flag.Parse()
	if err := run(*tcpAddr, *udpAddr); err != nil {
		fmt.Fprintln(os.Stderr, "workload:", err)
		os.Exit(1)
	}
}

func run(tcpAddr, udpAddr string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	host, err := os.Hostname()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", tcpAddr)
	if err != nil {
		return err
	}
	defer ln.Close()
	pc, err := net.ListenPacket("udp", udpAddr)
	if err != nil {
		return err
	}
	defer pc.Close()
	fmt.Fprintf(os.Stderr, "workload: hostname %s tcp %s udp %s\n", host, ln.Addr(), pc.LocalAddr())

	errc := make(chan error, 2)
	go func() { errc <- serveTCP(ln, host) }()
	go func() { errc <- serveUDP(pc, host) }()
	select {
	case <-ctx.Done():
		return nil // the deferred Closes end both loops
	case err := <-errc:
		return err
	}
}

func serveTCP(ln net.Listener, host string) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return fmt.Errorf("tcp accept: %w", err)
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := fmt.Fprintf(c, "%s %s\n", host, c.RemoteAddr()); err != nil {
				return
			}
			// Half-close, then drain what the client sent until it closes:
			// closing with unread data would reset the connection and could
			// discard the line before the client reads it.
			if tc, ok := c.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			io.Copy(io.Discard, c)
		}()
	}
}

func serveUDP(pc net.PacketConn, host string) error {
	buf := make([]byte, 64<<10)
	prefix := host + " "
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return fmt.Errorf("udp read: %w", err)
		}
		reply := append([]byte(prefix), buf[:n]...)
		if _, err := pc.WriteTo(reply, from); err != nil {
			fmt.Fprintf(os.Stderr, "workload: udp reply to %s: %v\n", from, err)
		}
	}
}
