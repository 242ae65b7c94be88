# qoscni container image for people with Docker/BuildKit:
#   docker build -t qoscni/qoscni:dev .
# Without a daemon, "make image" builds the same image as a tarball
# (cmd/qoscni-image). Both binaries are static, so the image is scratch.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o /out/qoscni ./cmd/qoscni && \
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/qoscni-agent ./cmd/qoscni-agent

FROM scratch
# install.ImageBinDir: "qoscni-agent install" copies the plugin found next to itself.
COPY --from=build /out/qoscni /out/qoscni-agent /usr/local/bin/
ENV PATH=/usr/local/bin
EXPOSE 9742/tcp
ENTRYPOINT ["/usr/local/bin/qoscni-agent"]
CMD ["serve"]
