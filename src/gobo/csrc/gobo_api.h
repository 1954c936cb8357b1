/* Shared by gobo's C sources: symbols exported to ctypes, everything else hidden. */
#ifndef GOBO_API_H
#define GOBO_API_H
#if defined(_WIN32)
#define GOBO_API __declspec(dllexport)
#else
#define GOBO_API __attribute__((visibility("default")))
#endif
#endif
